"""Checks that the crate's declared rust-version is at least every dependency's.

Reads `cargo metadata` (all features) and compares the package's `rust-version` with the
`rust_version` of each package in the resolved graph of its normal (non-dev) dependencies.
The machine has one toolchain, so this metadata check stands in for building with the
declared version itself.
"""

import json
import subprocess
import sys


def version(text):
    parts = [int(part) for part in text.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


meta = json.loads(
    subprocess.check_output(
        ["cargo", "metadata", "--format-version", "1", "--all-features"]
    )
)
packages = {p["id"]: p for p in meta["packages"]}
root = meta["resolve"]["root"] or next(
    p["id"] for p in meta["packages"] if p["name"] == "tower-idempotency"
)
declared = packages[root]["rust_version"]
nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}

# Walk normal and build dependencies only: dev-dependencies never reach a user.
seen, stack = set(), [root]
while stack:
    node = nodes[stack.pop()]
    for dep in node["deps"]:
        kinds = {k["kind"] for k in dep["dep_kinds"]}
        if node["id"] == root and kinds <= {"dev"}:
            continue
        if dep["pkg"] not in seen:
            seen.add(dep["pkg"])
            stack.append(dep["pkg"])

needs = max(
    ((packages[p].get("rust_version") or "0", packages[p]["name"]) for p in seen),
    key=lambda item: version(item[0]),
)
print(f"rust-version declared {declared}; dependencies need {needs[0]} ({needs[1]})")
if version(needs[0]) > version(declared):
    sys.exit(f"rust-version {declared} is lower than {needs[1]}'s {needs[0]}")
