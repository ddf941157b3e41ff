"""kvae: train a variational autoencoder in Keras 3, ship its halves to devices.

`import kvae` stays TensorFlow-free: training modules import TensorFlow themselves, the
runtime (`kvae.runtime`, `kvae.sample`) never does.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # hide TensorFlow's C++ start-up chatter

__version__ = "0.1.0"
