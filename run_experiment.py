"""Run a WiCore experiment: ``python run_experiment.py [hydra overrides]``.

Examples::

    python run_experiment.py                                   # reference scenario: Gemma-3-27B on 2x T10
    python run_experiment.py experiment=batching_comparison -m
    python run_experiment.py -m hardware=t10x2,h100 model=gemma3-27b,gemma3-12b \
        scheduler.batching=static,continuous,chunked_prefill
"""

from experiments.main import main

if __name__ == "__main__":
    main()
