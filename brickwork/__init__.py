"""brickwork: modular neural networks from bricks, with the compute they really cost."""

__version__ = "0.1.0"
