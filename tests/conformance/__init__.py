"""`make test-conformance`: transformers' own common model tests on MatGPT2 (`common.py`, from the source distribution
of the installed transformers, fetched by `prepare.py`) and the students on older transformers (`old_transformers.py`).
Not part of the default suite: it downloads from PyPI."""
