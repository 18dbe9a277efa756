"""resjax datasets: in-memory image splits (`images`) and their one-off preparation (`prepare`)."""
