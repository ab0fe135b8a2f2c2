"""The napari faces: dock widget, coefficient plot and demo (Qt only here)."""
