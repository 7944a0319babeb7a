"""How results are shown: the console's report, the plots, results.json, report.html (the page, with
its template) and the benchmark's table.

The imports run one way, from here to the substrate that the frameworks share (common.data,
common.init, common.harness, common.files) and to impls/, never back: nothing outside this package
but compare.py imports it.
"""
