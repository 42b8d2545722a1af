"""``python -m dicom_node`` runs the ``cspine`` CLI."""

from dicom_node.cli import main

main()
