"""Frame batches, L2-L4 decoding, TCP reassembly and the ICS protocol parsers.

This package imports nothing from ``agent`` or ``models`` (see DESIGN.md, "Where things live").
"""
