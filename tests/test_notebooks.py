"""notebooks/embeddings.ipynb runs top to bottom (nbclient), so it cannot rot."""

from __future__ import annotations

import pytest

from brainfm.config import repo_root


def test_embeddings_notebook_runs_and_reports_subject_separability(hcp_h5, monkeypatch, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    monkeypatch.setenv("BRAINFM_NOTEBOOK_CKPT", "none")
    monkeypatch.setenv("BRAINFM_NOTEBOOK_STEPS", "30")  # trains a tiny model in the notebook itself
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel uses its inline backend
    nb = nbformat.read(repo_root() / "notebooks" / "embeddings.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "7 subjects" in text and "1-NN subject accuracy" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the t-SNE figure
    accuracy = float(text.split("held-out windows: ")[1].split()[0])
    assert 0.0 <= accuracy <= 1.0
