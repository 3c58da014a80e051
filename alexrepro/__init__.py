"""alexrepro: reproduce AlexNet (Krizhevsky, Sutskever & Hinton, NIPS 2012) on ILSVRC-2012."""

__version__ = "0.1.0"
