"""Experiment tooling around the server and the client: genfl-launch (one run on this machine),
genfl-sweep (the poster's grid, reports and figures) and genfl-centralised (the CAS reference).

Nothing here is part of a deployment: these tools start genfl-server and genfl-client as processes
and read the files they write, exactly as a user would."""
