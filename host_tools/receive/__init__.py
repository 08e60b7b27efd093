# The receiving side (README "Receiving"): sources (UDP, serial gateway, MQTT), the verifier,
# sinks, the spool and forwarders, node health. What `citynode receive` runs; never imports
# host_tools.sim.
