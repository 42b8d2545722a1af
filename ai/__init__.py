"""Volumes in, results out: loading, models, training and evaluation of cspine-node.

This package never imports ``dicom_node`` or ``storage``.
"""
