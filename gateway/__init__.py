"""gateway: an IVR voice gateway that bridges phone calls into video rooms."""

__version__ = "0.1.0"
