"""The applications: the command-line entry points built on the llm2clip library.

Each is ``python -m llm2clip.<name>`` (a shim that runs ``llm2clip.apps.<name>.main``): ``stage1``,
``extract``, ``train``, ``eval`` and ``demo``. Applications never import each other and the library
never imports them; what two of them share lives in the library.
"""
