"""kvtier: an open storage tier that keeps LLM inference fed.

The one package that users, plugins, the CLI and every service import. Nothing happens at import
time; submodules are imported by the code that needs them.
"""

__version__ = "0.1.0"
