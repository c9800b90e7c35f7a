"""Restore targets: where a reconstructed disk goes (raw file, qcow2, vmdk, vhdx, vhd, AHV)."""
