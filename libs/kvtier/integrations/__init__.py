"""Engine integrations: plugins that inference engines load by module path.

Each plugin module is imported only by its engine (SGLang, LMCache, vLLM), so importing this
package imports no engine and no SDK: `kvtier.integrations.keys` holds what they share (how an
engine's names map to a kvtier namespace and keys), and each engine's module builds its
engine-facing classes on first use.
"""
