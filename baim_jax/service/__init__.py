"""The GenAI service (paper Sec. III, step 7): the cloud's model store, the edge's toolbox and
the request lifecycle that joins them."""
