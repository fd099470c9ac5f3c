"""Nothing unsafe is ever loaded: every torch.load in the tree passes weights_only=True, and the cheap checkpoint
scan (find_latest_checkpoint by kind) never runs a malicious pickle either."""
from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest

import model as M
from conftest import REPO_DIR


def torch_load_calls(path: Path) -> list[ast.Call]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "load" and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"]


def test_every_torch_load_is_weights_only() -> None:
    """A source scan of every Python file in the repository (scripts, data/, tests/)."""
    files = [p for p in REPO_DIR.rglob("*.py") if not any(part.startswith(".") for part in p.parts)]
    assert len(files) > 10
    unsafe = []
    for path in files:
        for call in torch_load_calls(path):
            flags = {kw.arg: kw.value for kw in call.keywords}
            value = flags.get("weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                unsafe.append(f"{path.relative_to(REPO_DIR)}:{call.lineno}")
    assert unsafe == []
    assert torch_load_calls(REPO_DIR / "model.py"), "the scan must see model.py's loads"


class RunsCode:
    """Unpickling this writes a marker file: what an unsafe torch.load of a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch notes the crafted file's protocol
@pytest.mark.parametrize("kind", [None, "chat", "base"])
def test_checkpoint_scan_never_unpickles_code(tmp_path: Path, kind: str | None) -> None:
    marker = tmp_path / "marker.txt"
    bad = tmp_path / "logs" / "run" / "state_step000001.pt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(pickle.dumps({"model": RunsCode(marker), "kind": "chat"}))
    assert M.checkpoint_kind(bad) == "none"
    found = M.find_latest_checkpoint(tmp_path / "logs", kind=kind)
    assert found == (bad if kind is None else None)  # by name only when no kind is asked; never unpickled
    with pytest.raises(M.CheckpointError, match="not a loadable checkpoint"):
        M.load_checkpoint(bad)
    assert not marker.exists()
