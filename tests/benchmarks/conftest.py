"""Small synthetic Azure-format traces for the simulator's tests."""
import random
from datetime import datetime, timedelta

import pytest


def write_trace(path, n, prompt, output, gap, seed):
    rng = random.Random(seed)
    t = datetime(2023, 11, 16, 18, 0, 0)
    with open(path, "w") as f:
        f.write("TIMESTAMP,ContextTokens,GeneratedTokens\n")
        for _ in range(n):
            t += timedelta(seconds=rng.expovariate(1 / gap))
            f.write(f"{t:%Y-%m-%d %H:%M:%S.%f}0,{rng.randint(*prompt)},{rng.randint(*output)}\n")


@pytest.fixture(scope="session")
def traces(tmp_path_factory):
    d = tmp_path_factory.mktemp("traces")
    code, conv = str(d / "code.csv"), str(d / "conv.csv")
    write_trace(code, 400, (500, 3500), (5, 60), 0.4, 1)
    write_trace(conv, 800, (300, 2500), (20, 300), 0.2, 2)
    return {"code": code, "conv": conv}
