"""wss-ray: weakly (score-)supervised music source separation on Ray."""
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so `import wss_ray` stays light (no torch) for the CLI's --help.
    if name == "Separator":
        from wss_ray.separate import Separator
        return Separator
    raise AttributeError(name)
