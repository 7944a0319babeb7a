"""How results are shown: the console's report, the plots, results.json, report.html (the page, with
its template) and the benchmark's table.

The imports run one way: the driving code (common/drivers/) calls this package; it reads the
registry of implementations (impls/registry.py) and the substrate (common.files), never the
driving code (tests/test_layout.py).
"""
