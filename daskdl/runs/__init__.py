"""The client side of every run: checks, the plan, the start, the coordinator, `Run`, trackers,
`launch`."""
