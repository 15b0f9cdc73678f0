"""Structured outputs through the official openai SDK on the real model (the preset
cluster-configs/local.yaml serves, kvray:smollm2-135m-instruct), with schemas that bound no
length: ``parse()`` gives a valid object every time, streamed and not. The requests of a test go
together (the engine batches them), so 40 of them take seconds, not minutes, on CPU."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from pydantic import BaseModel

pytest.importorskip("ray")
openai = pytest.importorskip("openai")

from serve_app import local_config, running_app, served_name  # noqa: E402

SAMPLING = {"temperature": 0.2, "top_p": 0.9}  # what SmolLM2's model card recommends; seeds vary the samples
MESSAGES = [{"role": "system", "content": "You answer with one JSON object."},
            {"role": "user", "content": "Describe Paris, the capital of France."}]


class Landmark(BaseModel):
    name: str
    year_built: int


class City(BaseModel):
    name: str
    country: str
    population: int
    is_capital: bool
    famous_landmark: Landmark


@pytest.fixture(scope="module")
def client():
    args = local_config(real_model=True)["applications"][0]["args"]
    with running_app(args, num_replicas=1) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300), served_name(
            local_config(real_model=True))


def _parse(client, name, seed: int) -> City:
    done = client.chat.completions.parse(model=name, messages=MESSAGES, response_format=City, seed=seed,
                                         max_tokens=300, **SAMPLING)
    assert done.choices[0].finish_reason == "stop", done.choices[0].message.content
    return done.choices[0].message.parsed


def _parse_streamed(client, name, seed: int) -> City:
    with client.chat.completions.stream(model=name, messages=MESSAGES, response_format=City, seed=seed,
                                        max_tokens=300, **SAMPLING) as stream:
        done = stream.get_final_completion()
    return done.choices[0].message.parsed


@pytest.mark.parametrize("how", [_parse, _parse_streamed], ids=["parse", "streamed"])
def test_parse_gives_20_valid_objects_on_the_real_model(client, how):
    c, name = client
    with ThreadPoolExecutor(10) as pool:
        objects = list(pool.map(lambda seed: how(c, name, seed), range(20)))
    assert all(isinstance(o, City) for o in objects), objects
    # a real model answers the question, not just the grammar
    assert sum(o.name.strip().lower().startswith("paris") for o in objects) >= 15, [o.name for o in objects]
