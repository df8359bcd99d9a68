"""Callbacks for training frameworks; each module imports its framework only when imported.

    from stepscope.integrations.lightning import StepscopeCallback      # pip install stepscope[lightning]
    from stepscope.integrations.transformers import StepscopeCallback   # pip install stepscope[transformers]
"""
