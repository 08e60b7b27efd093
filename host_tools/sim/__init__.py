# The simulator: the fleet of simulated nodes in lockstep, the shared LoRa air, generated
# weather, the sim-board on a pseudo-terminal and the demo. Apart from the production path:
# nothing outside host_tools/sim (and the demo and sim-board commands) imports it.
