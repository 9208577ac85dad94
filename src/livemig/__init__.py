"""livemig: live migration of QEMU virtual machines, after Clark et al. (NSDI 2005)."""

__version__ = "0.1.0"
