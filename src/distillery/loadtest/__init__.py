"""Load testing: the HTTP load generator (`generator`) and the load test of a deployed
run (`run`: sweeps over concurrency, the autoscaling ramp, its report)."""
