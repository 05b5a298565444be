"""Writes the cross-domain evaluation sets (conf/eval/cross_domain.yaml) as one text file per document, so that a GPU
machine without this project's data packages (gensim, scikit-learn) or with another Python (pydoc:topics changes with
the version) evaluates the same documents: bench/gpu_env.sh reads them back as package:vtrans_domains/<name>/*.txt.

    python bench/gpu_domains.py .gpu/domains    # writes .gpu/domains/vtrans_domains/<name>/00000.txt, ...

Each set is read back through that source here and compared document for document with the original. A document
that the text-file check refuses (more than 1 % control characters: one Usenet post) is written without its control
characters, and the export says which."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

CONF = Path(__file__).resolve().parents[1] / "conf" / "eval" / "cross_domain.yaml"
PACKAGE = "vtrans_domains"


def export(root: Path, domains: dict[str, str] | None = None) -> dict[str, int]:
    """Every domain's documents under root/vtrans_domains/<name>/; returns the document count per domain."""
    from omegaconf import OmegaConf

    from vtrans.data import _CONTROL, TEXT_CONTROL_LIMIT, load_documents

    domains = domains if domains is not None else dict(OmegaConf.load(CONF).domains)
    package = Path(root) / PACKAGE
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").touch()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    counts = {}
    for name, source in domains.items():
        docs = [d.text for d in load_documents(source)]
        for i, text in enumerate(docs):
            if len(_CONTROL.findall(text)) > TEXT_CONTROL_LIMIT * len(text):
                docs[i] = _CONTROL.sub("", text).strip()
                print(f"{name} document {i}: {len(_CONTROL.findall(text))} control characters dropped "
                      "(a text file may hold at most 1 %)")
        out = package / name
        out.mkdir(exist_ok=True)
        for old in out.glob("*.txt"):
            old.unlink()
        for i, text in enumerate(docs):
            (out / f"{i:05d}.txt").write_text(text, encoding="utf-8")
        back = [d.text for d in load_documents(f"package:{PACKAGE}/{name}/*.txt")]
        if back != docs:
            raise RuntimeError(f"{name}: the files under {out} do not read back as the documents of {source}")
        counts[name] = len(docs)
    return counts


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/gpu_domains.py <directory>")
    for name, n in export(Path(sys.argv[1])).items():
        print(f"{name}: {n} documents")
