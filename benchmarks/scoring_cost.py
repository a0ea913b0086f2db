"""`python -m benchmarks.scoring_cost`: the report script behind `altermoma.scoring_cost` (kept so recorded commands still run)."""

from altermoma.scoring_cost import main

if __name__ == "__main__":
    raise SystemExit(main())
