"""Execute the Colab quickstart notebook end to end with nbclient."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "colab" / "quickstart.ipynb"


def _outputs(notebook) -> str:
    texts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            texts.append(output.get("text", ""))
    return "\n".join(texts)


def test_quickstart_runs_on_synthetic_and_uploaded_trace(flame_npz: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECMD_NOTEBOOK_TRACE", str(flame_npz))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3").execute()
    text = _outputs(notebook)

    assert "synthetic:olmoe-1b-7b" in text
    assert "flame-moe-290m: 2048 passes, 8 layers, 64 experts, top-6, 0 missing cells" in text
    # Two tables, each with a Least-Stale row and the Belady bound column.
    assert text.count("belady_bound") == 2
    assert text.count("least-stale") >= 2
