"""Reading a tool-call constraint's structural tag back, for the tests: its call tags and the most
calls it allows (kvray.frontend.tool_grammar builds one call, then up to MAX_CALLS - 1 more)."""


def calls_of(fmt: dict) -> tuple[list[dict], int]:
    """(the call tags, the most calls) of the calls part of a structural tag's format (inside a
    JSON array's brackets where the format has them)."""
    if fmt["type"] == "sequence" and fmt["elements"][0].get("type") == "const_string":  # [ calls ]
        fmt = fmt["elements"][1]
    if fmt["type"] == "sequence" and fmt["elements"][-1].get("type") == "repeat":
        call, more = fmt["elements"][0], fmt["elements"][-1]["max"]
    else:
        call, more = fmt, 0
    tags = call["elements"] if call["type"] == "or" else [call]
    return tags, 1 + more
