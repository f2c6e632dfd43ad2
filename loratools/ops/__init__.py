"""Operations on checkpoints and adapters: plan first, then execute (see plan.py, execute.py)."""
