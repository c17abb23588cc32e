"""`python -m veil.kernel -f {connection_file}`: start the Veil kernel (the kernelspec's argv)."""

from __future__ import annotations

from ipykernel.kernelapp import IPKernelApp

from veil.kernel.kernel import VeilKernel


def main() -> None:
    """Launch an IPython kernel app whose kernel is `VeilKernel`."""
    IPKernelApp.launch_instance(kernel_class=VeilKernel)


if __name__ == "__main__":
    main()
