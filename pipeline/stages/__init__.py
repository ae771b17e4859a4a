"""The stages of the DAG, one file each (its config and how it processes one unit of work), and
``framework``: the stage contract and the one executor and Beam adapter that run them all."""
