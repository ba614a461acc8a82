"""The torch and Triton releases fusedopt supports: the oldest is the GPU validation machine's
(torch 2.11 with Triton 3.6), the newest the development machines' (torch 2.13 with Triton
3.9).  pyproject.toml declares the lower bounds; newer releases are allowed but untested."""

from __future__ import annotations

import re

SUPPORTED = {"torch": ((2, 11), (2, 13)), "triton": ((3, 6), (3, 9))}


def release(version: str) -> tuple[int, int] | None:
    """(major, minor) of a version string such as "2.13.0+cpu", or None."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else None


def supported_range(name: str) -> str:
    (lo_major, lo_minor), (hi_major, hi_minor) = SUPPORTED[name]
    return f"{lo_major}.{lo_minor} to {hi_major}.{hi_minor}"


def support_note(name: str, version: str) -> str:
    """"" for a supported `version` of `name` ("torch", "triton"), else what is wrong with it."""
    found = release(version)
    oldest, newest = SUPPORTED[name]
    if found is None:
        return f"unknown version; supported: {supported_range(name)}"
    if found < oldest:
        return f"older than supported ({supported_range(name)})"
    if found > newest:
        return f"newer than tested ({supported_range(name)})"
    return ""
