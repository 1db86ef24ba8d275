"""The shape of the code, checked: requests flow transport -> dataplane -> scheduler -> runtime, so
no folder imports one above it, only `server/` speaks ASGI or gRPC, and nothing that serves
imports the synthetic data generators, the client tools, the pipeline or the demo builder."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "src" / "bedside"

# Lower ranks are more basic; a module may import its own folder and lower ranks only.
RANK = {
    "errors": 0,
    "settings": 0,
    "__init__": 0,
    "protocol": 1,
    "clinical": 1,
    "modelconfig": 2,
    "monitoring": 2,
    "security": 2,
    "runtime": 3,
    "graphs": 4,
    "repository": 4,
    "scheduler": 4,
    "dataplane": 5,
    "alerts": 6,
    "medication": 5,
    "updates": 6,
    "streams": 7,
    "server": 8,
    # not serving: data generation, model building, client tools, the command line
    "synthetic": 2,
    "pipeline": 9,
    "planning": 9,
    "cluster": 9,  # bedside on Ray Serve: above the server, whose gateway and REST app it runs
    "tools": 9,
    "models": 10,
    "cli": 11,
    "__main__": 12,
}
SERVING = {"errors", "settings", "protocol", "clinical", "modelconfig", "monitoring", "security", "runtime"}
SERVING |= {"repository"}
SERVING |= {"scheduler", "dataplane", "alerts", "streams", "server", "updates", "medication", "graphs"}
NOT_FOR_SERVING = {"synthetic", "pipeline", "models", "tools", "cli", "planning", "cluster"}
WIRE_MODULES = {"uvicorn", "grpc", "starlette", "websockets", "h11", "httptools"}
ASGI_EVENTS = ("http.response.", "http.request", "http.disconnect", "websocket.", "lifespan.")


def modules() -> list[tuple[str, Path, ast.Module]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "_pb2" in path.name:
            continue  # generated protobuf code
        folder = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        found.append((folder, path, ast.parse(path.read_text(encoding="utf-8"))))
    return found


def bedside_imports(tree: ast.Module) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bedside"):
            parts = node.module.split(".")
            out += [parts[1]] if len(parts) > 1 else [a.name if a.name in RANK else "__init__" for a in node.names]
        elif isinstance(node, ast.Import):
            out += [a.name.split(".")[1] for a in node.names if a.name.startswith("bedside.")]
    return out


def test_every_folder_has_a_rank():
    assert {folder for folder, _, _ in modules()} <= set(RANK)


def test_no_folder_imports_one_above_it():
    upward = []
    for folder, path, tree in modules():
        for target in bedside_imports(tree):
            if target != folder and RANK.get(target, 99) >= RANK[folder]:
                upward.append(f"{path.relative_to(PACKAGE)} -> {target}")
    assert upward == []


def test_serving_code_never_imports_generators_tools_or_the_pipeline():
    leaks = []
    for folder, path, tree in modules():
        if folder in SERVING:
            leaks += [f"{path.relative_to(PACKAGE)} -> {t}" for t in bedside_imports(tree) if t in NOT_FOR_SERVING]
    assert leaks == []


def test_only_the_server_speaks_asgi_or_grpc():
    speaking = []
    for folder, path, tree in modules():
        if folder in ("server", "tools", "cli"):  # tools are clients; they may use a client library
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                speaking += [
                    f"{path.relative_to(PACKAGE)} imports {n}" for n in names if n.split(".")[0] in WIRE_MODULES
                ]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(ASGI_EVENTS):
                speaking += [f"{path.relative_to(PACKAGE)} uses ASGI event {node.value!r}"]
    assert speaking == []


@pytest.mark.parametrize("limit", [400])
def test_modules_stay_small(limit):
    large = [
        f"{path.relative_to(PACKAGE)}: {n} lines"
        for _, path, _ in modules()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > limit
    ]
    assert large == []
