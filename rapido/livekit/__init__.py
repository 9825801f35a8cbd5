"""LiveKit output: region choice, access tokens, the publishing sink, the agents avatar
protocol. Import the submodules directly; this package keeps its import cheap."""
