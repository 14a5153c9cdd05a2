"""What the notebooks stand on: `runner` executes them with papermill into run directories (`kvlab run`), and
`defaults` turns their "auto" parameters into a device and models that fit it."""
