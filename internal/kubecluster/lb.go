//go:build linux

package kubecluster

import (
	"github.com/tsrelay/tsrelay/internal/cmdline"

	"context"
	"fmt"
	"net/netip"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
)

// metallbIPs is MetalLB's annotation naming the addresses a Service wants,
// which the examples use.
const metallbIPs = "metallb.io/loadBalancerIPs"

// runLoadBalancer is the cluster's load-balancer controller, until ctx
// ends: it gives each LoadBalancer Service an IPv4 address, the first of
// its metallb.io/loadBalancerIPs annotation if it has one (as MetalLB
// would), else the next of LBPool, routes it from the internet to the node,
// and writes it into the Service's status. kube-proxy then forwards the
// Service's ports on that address to its pods.
func (c *Cluster) runLoadBalancer(ctx context.Context) {
	for ctx.Err() == nil {
		if err := c.watchServices(ctx); err != nil && ctx.Err() == nil {
			c.opts.Log.Warn("load-balancer controller", "err", err)
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
		}
	}
}

// watchServices lists the Services, assigns addresses, and follows changes
// until the watch ends.
func (c *Cluster) watchServices(ctx context.Context) error {
	list, err := c.Client.CoreV1().Services("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	for i := range list.Items {
		if err := c.assign(ctx, &list.Items[i]); err != nil {
			return err
		}
	}
	w, err := c.Client.CoreV1().Services("").Watch(ctx, metav1.ListOptions{ResourceVersion: list.ResourceVersion})
	if err != nil {
		return err
	}
	defer w.Stop()
	for ev := range w.ResultChan() {
		switch ev.Type {
		case watch.Added, watch.Modified:
			if svc, ok := ev.Object.(*corev1.Service); ok {
				if err := c.assign(ctx, svc); err != nil {
					return err
				}
			}
		case watch.Deleted:
			if svc, ok := ev.Object.(*corev1.Service); ok {
				c.release(svc)
			}
		case watch.Error:
			return fmt.Errorf("watch Services: %v", ev.Object)
		}
	}
	return nil
}

// assign gives svc its address if it is a LoadBalancer without one.
func (c *Cluster) assign(ctx context.Context, svc *corev1.Service) error {
	if svc.Spec.Type != corev1.ServiceTypeLoadBalancer || len(svc.Status.LoadBalancer.Ingress) > 0 {
		return nil
	}
	key := svc.Namespace + "/" + svc.Name
	var addr netip.Addr
	c.mu.Lock()
	for _, s := range strings.Split(svc.Annotations[metallbIPs], ",") {
		if a, err := netip.ParseAddr(strings.TrimSpace(s)); err == nil && a.Is4() {
			addr = a
			break
		}
	}
	if !addr.IsValid() {
		for a, owner := range c.lbIPs {
			if owner == key {
				addr = a
			}
		}
	}
	if !addr.IsValid() {
		for c.lbIPs[c.lbNext] != "" {
			c.lbNext = c.lbNext.Next()
		}
		addr = c.lbNext
		c.lbNext = c.lbNext.Next()
	}
	if !LBPool.Contains(addr) && c.lbIPs[addr] == "" {
		// An address of the Service's own choosing: route it to the node
		// too.
		if err := cmdline.Run(ctx, fmt.Sprintf("ip route replace %v/32 via %v", addr, NodeIP)); err != nil {
			c.mu.Unlock()
			return err
		}
	}
	c.lbIPs[addr] = key
	c.mu.Unlock()

	svc = svc.DeepCopy()
	svc.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{{IP: addr.String(), IPMode: ptr(corev1.LoadBalancerIPModeVIP)}}
	if _, err := c.Client.CoreV1().Services(svc.Namespace).UpdateStatus(ctx, svc, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("give Service %s the address %v: %w", key, addr, err)
	}
	c.opts.Log.Info("load balancer", "service", key, "address", addr)
	return nil
}

// release forgets svc's address.
func (c *Cluster) release(svc *corev1.Service) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for a, owner := range c.lbIPs {
		if owner == svc.Namespace+"/"+svc.Name {
			delete(c.lbIPs, a)
		}
	}
}

func ptr[T any](v T) *T { return &v }
