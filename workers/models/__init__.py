"""Models wing: built-in example models (``model._target_`` in configs/model/): any ``nn.Module`` works the same
way. May import: torch only."""
