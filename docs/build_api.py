"""Builds the API reference from the docstrings, one HTML page per public module.

    python docs/build_api.py [OUT_DIR]        # default: docs/api (not committed; open OUT_DIR/index.html)

Private modules (`_name.py`) are not shown: their functions appear under the public package that
exports them, which is the one path users import them from. tests/test_layout.py builds it, so a
docstring that pdoc cannot render fails CI.
"""
import pathlib
import sys

import pdoc
import pdoc.render


def main(out: str = "docs/api") -> None:
    pdoc.render.configure(docformat="google", search=True, show_source=True)
    pdoc.pdoc("distill_jax", "!distill_jax\\..*\\._.*", output_directory=pathlib.Path(out))


if __name__ == "__main__":
    main(*sys.argv[1:])
