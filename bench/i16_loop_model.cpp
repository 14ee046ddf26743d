// A hand-written model of the i16 path's tile loop (i16_rows at 4 batch rows and its per-group epilogue), on random
// codes and x, one thread: the rate the loop's instructions allow, without the op's surroundings. docs/serving.md
// ("Many batch rows on AVX2") compares the kernel (bench/cpu_block_driver.cpp) with it.
//
//   g++ -O3 -march=native -o /tmp/i16_loop_model bench/i16_loop_model.cpp && /tmp/i16_loop_model K G N
//   e.g. /tmp/i16_loop_model 8960 32 1536 (M = 16 batch rows, 4 row tiles per group; cycles assume 3.1 GHz)
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <vector>
#include <cstdlib>
__attribute__((target("avx2"))) inline void in_register(__m256i& v) { asm("" : "+x"(v)); }
__attribute__((target("avx2"))) inline __m256i bp(const uint32_t* p){return _mm256_castps_si256(_mm256_broadcast_ss((const float*)p));}
__attribute__((target("avx2"))) inline __m256i cp(__m256i d,int t,__m256i mask){ if(t==0) return _mm256_and_si256(d,mask); if(t==3) return _mm256_srli_epi16(d,12); return _mm256_and_si256(_mm256_srli_epi32(d,4*t),mask);}
__attribute__((target("avx2"))) inline void mp(__m256i c0,__m256i c1,const uint32_t*p,__m256i&lo,__m256i&hi){const __m256i xv=bp(p); lo=_mm256_add_epi32(lo,_mm256_madd_epi16(c0,xv)); hi=_mm256_add_epi32(hi,_mm256_madd_epi16(c1,xv)); in_register(lo); in_register(hi);}
struct St{__m256 s0,s1,o0,o1;};
__attribute__((target("avx2,fma"))) inline void epi(__m256i a0,__m256i a1,const St&st,float sigma,float qsum,float*tot){
  const __m256 sg=_mm256_set1_ps(sigma),qs=_mm256_set1_ps(qsum);
  const __m256 t0=_mm256_fmsub_ps(_mm256_cvtepi32_ps(a0),st.s0,_mm256_mul_ps(st.o0,qs));
  const __m256 t1=_mm256_fmsub_ps(_mm256_cvtepi32_ps(a1),st.s1,_mm256_mul_ps(st.o1,qs));
  _mm256_storeu_ps(tot,_mm256_fmadd_ps(sg,t0,_mm256_loadu_ps(tot)));
  _mm256_storeu_ps(tot+8,_mm256_fmadd_ps(sg,t1,_mm256_loadu_ps(tot+8)));
}
template<int WORDS>
__attribute__((target("avx2,fma"),always_inline)) inline void rows4(const uint32_t* wb,const uint32_t* xr,int64_t words,int64_t pairs,const St&st,const float*sig,const float*qs,int64_t sstride,float* acc){
  const __m256i mask=_mm256_set1_epi32(0x000F000F);
  __m256i lo0=_mm256_setzero_si256(),hi0=lo0,lo1=lo0,hi1=lo0,lo2=lo0,hi2=lo0,lo3=lo0,hi3=lo0;
  const uint32_t *x0=xr,*x1=xr+pairs,*x2=xr+2*pairs,*x3=xr+3*pairs;
  for(int64_t q=0;q<(WORDS?WORDS:words);++q,wb+=16){
    const __m256i d0=_mm256_loadu_si256((const __m256i*)wb), d1=_mm256_loadu_si256((const __m256i*)(wb+8));
    for(int t=0;t<4;++t){ const __m256i c0=cp(d0,t,mask),c1=cp(d1,t,mask);
      mp(c0,c1,x0+4*q+t,lo0,hi0); mp(c0,c1,x1+4*q+t,lo1,hi1); mp(c0,c1,x2+4*q+t,lo2,hi2); mp(c0,c1,x3+4*q+t,lo3,hi3);}
  }
  epi(lo0,hi0,st,sig[0],qs[0],acc); epi(lo1,hi1,st,sig[sstride],qs[sstride],acc+16); epi(lo2,hi2,st,sig[2*sstride],qs[2*sstride],acc+32); epi(lo3,hi3,st,sig[3*sstride],qs[3*sstride],acc+48);
}
int main(int argc,char**argv){
  int64_t K=atoi(argv[1]); int64_t G=atoi(argv[2]); int64_t M=16; int64_t N=atoi(argv[3]);
  int64_t words=K/8, pairs=K/2, groups=K/G, wpg=G/8;
  std::vector<uint32_t> w((N/16)*words*16); std::vector<uint32_t> x(M*pairs); for(auto&v:w)v=rand(); for(auto&v:x)v=rand()&0x3fff3fff;
  std::vector<float> sig(M*groups,1e-3f), qs(M*groups,3.f); std::vector<float> steps((N/16)*groups*4*8, 0.01f);  // per group: scale0, scale1, offset0, offset1 (8 lanes each)
  std::vector<float> acc(M*16);
  long reps=std::max<long>(1,4000000000L/(K*N*M));
  auto t0=std::chrono::steady_clock::now();
  for(long r=0;r<reps;r++) for(int64_t b=0;b<N/16;b++){
    for(int64_t gi=0;gi<groups;gi++){
      const float* sp=&steps[(b*groups+gi)*32]; St st{_mm256_loadu_ps(sp),_mm256_loadu_ps(sp+8),_mm256_loadu_ps(sp+16),_mm256_loadu_ps(sp+24)};
      const uint32_t* wb=w.data()+(b*words+gi*wpg)*16;
      for(int m0=0;m0<M;m0+=4){ if(G==32) rows4<4>(wb,x.data()+m0*pairs+gi*G/2,wpg,pairs,st,&sig[m0*groups+gi],&qs[m0*groups+gi],groups,acc.data()+m0*16);
        else rows4<0>(wb,x.data()+m0*pairs+gi*G/2,wpg,pairs,st,&sig[m0*groups+gi],&qs[m0*groups+gi],groups,acc.data()+m0*16);}
    }
  }
  double s=std::chrono::duration<double>(std::chrono::steady_clock::now()-t0).count();
  double macs=(double)reps*K*N*M;
  printf("K=%ld G=%ld N=%ld: %.1f GMAC/s, %.1f cycles/word-tile (%.3f)\n",K,G,N,macs/s/1e9,s*3.1e9/(reps*(N/16)*words*4), acc[5]);
}
