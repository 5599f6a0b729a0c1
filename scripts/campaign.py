"""The long runs at the paper's schedule, in the background across sessions (lvae.training.campaign).

    python scripts/campaign.py start     # first thing each session: two nice'd workers, one thread each
    python scripts/campaign.py status    # epochs, last test L1 / L_5000, seconds per epoch, milestones kept
    python scripts/campaign.py stop
"""
from lvae.training.campaign import main

main()
