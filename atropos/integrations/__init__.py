"""Adapters that let other agent frameworks run in the pool's slots, each through the framework's own
extension point, each installed with the extra named after it (`pip install 'atropos-sandbox[NAME]'`)."""


def missing_framework(framework: str, extra: str, exc: ImportError) -> ImportError:
    """The one-line error of an adapter whose framework is not installed."""
    return ImportError(f"{framework} is not installed ({exc.name or exc}): pip install 'atropos-sandbox[{extra}]'")
