"""What drives the implementations: the commands compare.py runs (commands.py), from a Settings
(settings.py), through the training loop and its clocks (harness.py), the benchmark (bench.py), the
workers of a data-parallel run (workers.py), checkpoints in every format (checkpoints.py) and their
deployment (deployment.py); what each command writes (outputs.py) and how it stops (stopping.py).

The imports run one way: compare.py imports this package; it imports the presentation
(common/report/), the frameworks through their registry (impls/registry.py) and the substrate
(common/), never back (tests/test_layout.py).
"""
