# Empty dependencies file for pme.
# This may be replaced when dependencies are built.
