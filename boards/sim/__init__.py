# The simulated board and its simulated parts (README.md "Boards"): copied onto the simulated
# board only; `citynode flash` leaves this folder off real boards.
