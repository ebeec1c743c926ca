"""The verbs ``cli.py`` adds beyond LightningCLI's fit/validate/test, one module per verb family.

``inference`` holds generate, chat and ``data em``; ``evaluation`` holds eval and experiment; ``discern``
holds discern.
"""
