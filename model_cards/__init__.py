"""Hub model card templates, packaged as ``nasiam_hf.model_cards`` (see pyproject.toml)."""
