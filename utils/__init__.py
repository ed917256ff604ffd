"""Small modules shared by the PureCC stage scripts: one place for each thing."""
