"""Nutanix AHV: the Prism client, the snapshot/CRT/VG lifecycle, and the Prism simulator."""
