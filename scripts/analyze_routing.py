"""Routing analysis report of a saved model (the same as ``moe-gen analyze``).

Usage:
    python scripts/analyze_routing.py runs/demo/model --tasks digit_classification table_species \
        --out runs/demo/analysis
    python scripts/analyze_routing.py runs/attr/model --tasks digit_classification spoken_word_classification \\
        table_species motion_classification --out runs/compare --limit 64 --compare runs/token/model
    python scripts/analyze_routing.py runs/demo/model --tasks table_species --out analysis --mode generate

Writes ``routing.json``, ``report.md`` and PNG plots into ``--out`` (see ``moe_gen.analysis.report``).
"""

from __future__ import annotations

import sys

from moe_gen.analysis.report import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
